from __future__ import annotations

from datetime import UTC, datetime

import pytest

from broker.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 11, 25, 12, 0, tzinfo=UTC))
