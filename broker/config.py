"""The configuration file: TOML in, frozen pydantic models out, every problem reported at once.

The key names are a contract (SPEC section 4): users' files depend on them. Every model
forbids unknown keys so a typo is an error instead of a silently ignored setting, and
secrets are accepted only through `*_env` / `*_file` keys so they never sit in a file that
gets pasted into a bug report.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from broker.configtypes import Duration as Duration
from broker.configtypes import PositiveDuration as PositiveDuration
from broker.configtypes import SecretRef as SecretRef
from broker.configtypes import StrictModel as _Model
from broker.errors import ConfigError, SecretError
from broker.providers import registry

# The marketplaces' sections live in their modules (broker/providers/), listed in the
# registry; these names stay importable from here.
from broker.providers.paper import PaperProvider as PaperProvider
from broker.providers.runpod import RunpodProvider as RunpodProvider
from broker.providers.sections import PolledProvider as PolledProvider
from broker.providers.sections import ProviderKey as ProviderKey
from broker.providers.vast import VastProvider as VastProvider
from broker.units import parse_hostport

CONFIG_ENV = "GPU_BROKER_CONFIG"
DEFAULT_CONFIG_PATHS = (Path("config.toml"), Path("/etc/gpu-broker/config.toml"))
# What broker.host_name may be: a name that reads well in a report column and a log line.
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")

# Keys that would hold a secret inline. They are not fields of any model, so without this
# table a user writing `api_key = "..."` would only be told "unknown key".
_INLINE_SECRET_KEYS = {"api_key", "api_token", "token", "password", "secret", "key"}


def _listen(value: str) -> str:
    parse_hostport(value)
    return value


def _cron(value: str) -> str:
    text = value.strip()
    fields = text.split()
    if not text.startswith("@") and len(fields) != 5:
        raise ValueError(
            f'expected a 5-field cron expression like "0 22 * * *", got "{value}"'
        )
    if not croniter.is_valid(text):
        raise ValueError(f'expected a cron expression like "0 22 * * *", got "{value}"')
    try:
        croniter(text, datetime(2024, 1, 1)).get_next(datetime)
    except CroniterBadDateError:
        raise ValueError(f'the cron expression "{value}" never fires') from None
    return text


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f'expected an IANA time zone like "Europe/Berlin", got "{value}"'
        ) from None
    return value


ListenAddress = Annotated[str, AfterValidator(_listen)]
CronExpression = Annotated[str, AfterValidator(_cron)]
TimeZoneName = Annotated[str, AfterValidator(_timezone)]


def system_timezone() -> str:
    """The machine's own zone: `$TZ`, else `/etc/localtime`'s target, else UTC."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    try:
        target = os.readlink("/etc/localtime")
        candidates.append(target.split("zoneinfo/", 1)[-1])
    except OSError:
        pass
    for name in candidates:
        if name:
            try:
                ZoneInfo(name)
                return name
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return "UTC"


# The API token's least length after stripping: 16 characters of `openssl rand -hex 16`
# are 64 bits, beyond guessing over HTTP; a short or blank one is refused, not weakened.
MIN_TOKEN_CHARS = 16


class UnsafeTokenError(SecretError):
    """The API token is set but must not be used: blank, short, or readable by others."""


def is_loopback_host(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def check_database_url(value: str) -> str:
    """A PostgreSQL URL with no password in it (ValueError saying what is wrong otherwise;
    only the scheme is ever echoed, the rest may hold a secret)."""
    if not value.startswith(("postgresql://", "postgres://")):
        scheme = value.split(":", 1)[0] if "://" in value else value[:20]
        raise ValueError(
            'expected a PostgreSQL URL like "postgresql://broker@db.lan/fleet", '
            f'got "{scheme}://..."'
        )
    parts = urlsplit(value)
    try:
        inline = parts.password is not None
    except ValueError:
        inline = False
    query = {k.lower() for k in parse_qs(parts.query, keep_blank_values=True)}
    if inline or "password" in query:
        # Config files are read by many and copied around; the secret goes elsewhere.
        raise ValueError(
            "expected no password in the URL: use database_password_env, "
            "database_password_file, or a libpq service / password file"
        )
    return value


class BrokerSection(SecretRef):
    state_dir: Path = Path("~/.local/share/gpu-broker")
    database_url: str | None = None
    timezone: TimeZoneName = Field(default_factory=system_timezone)
    sample_interval: PositiveDuration = timedelta(seconds=1)
    api_listen: ListenAddress = "127.0.0.1:9477"
    api_token_env: str | None = "GPU_BROKER_TOKEN"
    api_token_file: Path | None = None
    # Names (or addresses) the API answers to besides its listen address and loopback: the
    # Host check that stops DNS rebinding (a web page talking to the API by a name of its own).
    api_allowed_hosts: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    # The name that keys this machine's rows in the ledger (default: the machine's host
    # name); in a shared database two brokers with one name are refused.
    host_name: str | None = None
    # The PostgreSQL password when the URL's user needs one and no libpq service or
    # password file supplies it; never in the URL itself.
    database_password_env: str | None = None
    database_password_file: Path | None = None
    # How many people use the local services: `gpu-broker sizing` sets its measured verdict
    # beside the rule of thumb for a team this size.
    team_size: int | None = Field(default=None, ge=1)

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        return None if value is None else check_database_url(value)

    @field_validator("host_name")
    @classmethod
    def _host_name(cls, value: str | None) -> str | None:
        if value is not None and not HOST_NAME.fullmatch(value):
            raise ValueError(
                f'expected a host name like "gpu-box-1" (letters, digits, ".", "-", "_"; at '
                f'most 253), got "{value}"'
            )
        return value

    @model_validator(mode="after")
    def _one_token_source(self) -> BrokerSection:
        if self.api_token_file is not None and "api_token_env" in self.model_fields_set:
            raise ValueError("set api_token_env or api_token_file, not both")
        if self.database_password_env and self.database_password_file is not None:
            raise ValueError("set database_password_env or database_password_file, not both")
        return self

    @property
    def host(self) -> str:
        """This machine's name in the ledger: host_name, else the machine's host name."""
        return self.host_name or socket.gethostname()

    def database_password(self) -> str | None:
        """The database password from its env or file; None when neither is named (libpq
        then looks in the service and password files)."""
        return self._read_secret(
            "broker.database_password", self.database_password_env, self.database_password_file
        )

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def api_exposed(self) -> bool:
        """The API listens beyond loopback (0.0.0.0, ::, a LAN address or a name)."""
        return not is_loopback_host(parse_hostport(self.api_listen)[0])

    def api_token(self) -> str | None:
        """The bearer token; None when no source is named. `SecretError` when the named
        source is unset or empty, `UnsafeTokenError` when the token is blank or shorter than
        MIN_TOKEN_CHARS, or its file is readable by group or others."""
        if self.api_token_file is not None:
            file = self.api_token_file.expanduser()
            key = "broker.api_token_file"
            try:
                mode = file.stat().st_mode
            except OSError:
                mode = 0  # not there: _read_secret says so
            if mode & 0o077:
                raise UnsafeTokenError(
                    key,
                    f"{file} is readable by group or others (mode {mode & 0o777:o}); "
                    f"chmod 600 {file}",
                )
            token = self._read_secret("broker.api_token", None, self.api_token_file)
        else:
            key = "broker.api_token_env"
            env = self.api_token_env
            raw = os.environ.get(env) if env else None
            if env and raw is not None and not raw.strip():
                raise UnsafeTokenError(key, f"environment variable {env} is blank")
            token = self._read_secret("broker.api_token", env, None)
        if token is not None and len(token) < MIN_TOKEN_CHARS:
            where = f"environment variable {self.api_token_env}" if key.endswith("_env") else (
                str(self.api_token_file)
            )
            raise UnsafeTokenError(
                key,
                f"the token in {where} is {len(token)} characters; at least "
                f"{MIN_TOKEN_CHARS} are required (e.g. openssl rand -hex 16)",
            )
        return token

    def api_token_state(self) -> tuple[str | None, str]:
        """What `check` and `run` accept: (token, "") or, on loopback only, (None, why
        there is none: the control routes then refuse everything). Raises `ConfigError`
        for an unsafe token, and for a missing one when the API listens beyond loopback
        (every route needs it then)."""
        try:
            token = self.api_token()
        except UnsafeTokenError:
            raise
        except SecretError as err:
            if self.api_exposed:
                raise ConfigError([self._exposed_needs_token("; ".join(err.problems))]) from None
            return None, "; ".join(err.problems)
        if token is None:
            if self.api_exposed:
                raise ConfigError([self._exposed_needs_token("no token source is named")])
            return None, "no API token is configured (broker.api_token_env or api_token_file)"
        return token, ""

    def _exposed_needs_token(self, why: str) -> str:
        return (
            f"broker.api_listen: {self.api_listen} is reachable from other machines, so every "
            f"route needs the API token, and there is none ({why}); set one, or listen on "
            "127.0.0.1"
        )


class FakeGpu(_Model):
    """One simulated GPU, for machines without NVIDIA hardware, demos and tests.

    Without a `timeline` it idles at `idle_watts` forever. A timeline is a list of steps;
    each step takes effect `at` a duration after the backend started and keeps its values
    until the next step. A key left out of a step keeps the previous step's value, so a step
    can change one thing. Power follows utilisation (`idle_watts` at 0 %, `load_watts` at
    100 %, linear between) unless a step sets `power_w`, which holds for that step only.
    `processes` replaces the whole list of processes on the GPU (`[]` clears it).

    Faults, to see how the broker copes: `unsupported` names fields the driver would answer
    "not supported" for (`energy_mj` = a GPU without an energy counter, as before Volta),
    `no_permission` fields it would refuse, `lost_at` when the GPU falls off the bus (it stays
    lost), `energy_resets_at` when the energy counter restarts from zero (a driver reload).

        fake = [{ name = "NVIDIA GeForce RTX 3090", idle_watts = 22, load_watts = 350,
                  energy_resets_at = ["12h"], timeline = [
            { at = "0s", utilization_pct = 0, memory_used_mb = 250 },
            { at = "2h", utilization_pct = 95, memory_used_mb = 18000,
              processes = [{ pid = 4242, name = "ollama", memory_mb = 17500 }] },
            { at = "2h30m", utilization_pct = 0, memory_used_mb = 250, processes = [] },
        ] }]
    """

    class Process(_Model):
        pid: int = Field(gt=0)
        name: str | None = None
        memory_mb: float = Field(default=0, ge=0)

    class Step(_Model):
        at: Duration
        utilization_pct: float | None = Field(default=None, ge=0, le=100)
        memory_used_mb: float | None = Field(default=None, ge=0)
        power_w: float | None = Field(default=None, ge=0)
        temperature_c: float | None = None
        processes: list[FakeGpu.Process] | None = None

    name: str = "NVIDIA GeForce RTX 3090"
    uuid: str | None = None
    memory_mb: int = Field(default=24576, gt=0)
    idle_watts: float = Field(default=22.0, ge=0)
    load_watts: float = Field(default=350.0, gt=0)
    max_watts: float | None = Field(
        default=None, gt=0, description="power limit the driver reports; default load_watts"
    )
    # Eco fields (a second-hand card may be misconfigured: these let a test model one).
    idle_pstate: int = Field(default=8, ge=0, le=15, description="P-state with no client")
    persistence_mode: bool = True
    power_limit_w: float | None = Field(
        default=None, gt=0, description="the enforced limit now; default max_watts"
    )
    power_default_w: float | None = Field(
        default=None, gt=0, description="the card's default limit; default max_watts"
    )
    power_min_w: float | None = Field(default=None, gt=0, description="lowest accepted limit")
    timeline: list[Step] = Field(default_factory=list)
    # Field names as in broker.gpu.base.GpuSample (`processes` for the process list).
    unsupported: list[
        Literal[
            "utilization_pct", "memory_used_mb", "power_w", "energy_mj", "pstate",
            "temperature_c", "processes",
        ]
    ] = Field(default_factory=list)
    # ... and "power_limit" / "persistence_mode": settings it would refuse to change (a
    # broker not running as root).
    no_permission: list[
        Literal[
            "utilization_pct", "memory_used_mb", "power_w", "energy_mj", "pstate",
            "temperature_c", "processes", "power_limit", "persistence_mode",
        ]
    ] = Field(default_factory=list)
    lost_at: Duration | None = None
    energy_resets_at: list[Duration] = Field(default_factory=list)

    @model_validator(mode="after")
    def _load_above_idle(self) -> FakeGpu:
        if self.load_watts < self.idle_watts:
            raise ValueError("load_watts must be at least idle_watts")
        if self.max_watts is not None and self.max_watts < self.load_watts:
            raise ValueError("max_watts must be at least load_watts")
        times = [step.at for step in self.timeline]
        if times != sorted(set(times)):
            raise ValueError("timeline: the steps' `at` must increase from step to step")
        ceiling = self.max_watts or self.load_watts
        for step in self.timeline:
            if step.power_w is not None and step.power_w > ceiling:
                raise ValueError(
                    f"timeline: power_w {step.power_w:g} is more than the card's limit "
                    f"({ceiling:g} W: max_watts, else load_watts)"
                )
            if step.memory_used_mb is not None and step.memory_used_mb > self.memory_mb:
                raise ValueError(
                    f"timeline: memory_used_mb {step.memory_used_mb:g} is more than "
                    f"memory_mb {self.memory_mb}"
                )
        return self


class GpusSection(_Model):
    backend: Literal["nvml", "fake", "auto"] = "auto"
    idle_utilization_pct: float = Field(default=5, ge=0, le=100)
    idle_memory_mb: int = Field(default=600, ge=0)
    # How long a GPU must look idle without a break before it counts as idle, so a gap
    # between two requests does not read as "idle".
    idle_debounce: Duration = timedelta(seconds=30)
    # Process names (or full paths) that may stay on an idle GPU: the local services' own
    # runners. Any other compute or graphics process keeps the GPU busy.
    allowed_processes: list[str] = Field(default_factory=list)
    # Listing processes costs milliseconds per GPU; utilisation and power are read every
    # broker.sample_interval, processes only this often.
    process_interval: PositiveDuration = timedelta(seconds=5)
    # A driver call that hangs (a GPU falling off the bus) must not stall the broker.
    sample_timeout: PositiveDuration = timedelta(seconds=5)
    fake: list[FakeGpu] = Field(
        default_factory=lambda: [FakeGpu(), FakeGpu()],
        description="GPUs simulated when backend is fake (or auto without a driver)",
    )


_SYSTEMD_UNIT = re.compile(r"systemd:[A-Za-z0-9:_.@\\-]+")


# a DNS name, an IPv4 address or an IPv6 address (brackets optional); no port, no scheme
_ALLOWED_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.\-]*[A-Za-z0-9.])?|\[?[0-9A-Fa-f:.]+\]?")


class ServiceSection(_Model):
    name: str = Field(min_length=1)
    kind: Literal["ollama", "comfyui", "openai"]
    upstream: str
    gate_listen: ListenAddress | None = None
    gpus: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    drain: str = "api"
    drain_command: str | None = None
    resume_command: str | None = None
    max_hold: Duration = timedelta(seconds=30)
    # Gate limits: a head or body over these is answered 431 / 413 instead of relayed.
    # The body default leaves room for base64 images sent to multimodal models.
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    max_body_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    # Host names the gate also answers to, besides its listen address and loopback (a
    # guard against DNS rebinding; "*" turns that guard off). Then the connection cap and
    # the timeouts: a request head must arrive within head_timeout (else 408), a kept-alive
    # connection may stay idle idle_timeout, a request body may stall body_timeout (408).
    allowed_hosts: list[str] = Field(default_factory=list)
    # A refused chat request (Ollama /api/chat, /api/generate, OpenAI /v1/chat/completions)
    # answered 200 with an assistant message saying why, for chat front ends that show a
    # 503 as a bare error; other routes and clients keep the 503.
    refuse_as_message: bool = False
    max_connections: int = Field(default=1024, ge=1)
    head_timeout: PositiveDuration = timedelta(seconds=10)
    idle_timeout: PositiveDuration = timedelta(seconds=75)
    body_timeout: PositiveDuration = timedelta(seconds=60)

    @field_validator("upstream")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", value):
            raise ValueError(
                f'expected an http(s) URL like "http://127.0.0.1:11435", got "{value}"'
            )
        return value.rstrip("/")

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if name != "*" and not _ALLOWED_HOST.fullmatch(name):
                raise ValueError(
                    f'expected host names like "gpu.lan" or "192.168.1.20" (or "*"), got "{name}"'
                )
        return [name.lower() for name in value]

    @field_validator("drain")
    @classmethod
    def _drain_kind(cls, value: str) -> str:
        if value in ("api", "command", "none") or _SYSTEMD_UNIT.fullmatch(value):
            return value
        raise ValueError(f'expected "api", "systemd:UNIT", "command" or "none", got "{value}"')

    @model_validator(mode="after")
    def _commands_for_command_drain(self) -> ServiceSection:
        if self.drain == "command" and not (self.drain_command and self.resume_command):
            raise ValueError('drain = "command" needs drain_command and resume_command')
        if self.drain != "command" and (self.drain_command or self.resume_command):
            raise ValueError(
                'drain_command and resume_command are used only with drain = "command"'
            )
        return self


class PolicySection(_Model):
    # idle_window and local_hold: 5 minutes each, as `scripts/bench-simulate` favours (the
    # models stay loaded for Ollama's keep_alive before that anyway; docs/simulate.md).
    idle_window: PositiveDuration = timedelta(minutes=5)
    drain_timeout: PositiveDuration = timedelta(minutes=2)
    min_listed: Duration = timedelta(minutes=30)
    max_cycles_per_day: int = Field(default=6, ge=1)
    local_hold: Duration = timedelta(minutes=5)
    max_commitment: PositiveDuration = timedelta(hours=2)
    reclaim: Literal["graceful", "displace-interruptible"] = "graceful"
    # Renew the live offer once its end is this much nearer than max_commitment, so
    # arriving renters see close to max_commitment left (most want hours, not minutes).
    # Unset: renew at half of max_commitment (the old sawtooth).
    renew_every: PositiveDuration | None = timedelta(minutes=10)
    # End each offer where a local visit before its end becomes this likely, by the team's
    # weekly rhythm learned from the demand record (after a week of it); unset: windows only.
    demand_risk: float | None = Field(default=None, gt=0, lt=1)


# Longer windows would make "is it open?" depend on occurrences far in the past; a week
# covers every schedule a person writes ("weekends", "every night").
MAX_WINDOW = timedelta(days=7)


class WindowSection(_Model):
    cron: CronExpression
    duration: PositiveDuration

    @field_validator("duration")
    @classmethod
    def _not_too_long(cls, value: timedelta) -> timedelta:
        if value > MAX_WINDOW:
            raise ValueError("expected at most 7d; use a cron that fires more often instead")
        return value


class TariffSection(WindowSection):
    price_per_kwh: float = Field(ge=0)
    carbon_g_per_kwh: float | None = Field(default=None, ge=0)


class EnergySection(_Model):
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$")
    price_per_kwh: float = Field(default=0.30, ge=0)
    overhead_watts: float = Field(default=0, ge=0)
    carbon_g_per_kwh: float = Field(default=0, ge=0)
    tariff: list[TariffSection] = Field(default_factory=list)


class EcoProfile(_Model):
    """`[eco.profile]`: settings the broker applies to every card through NVML while it
    runs and gives back at stop (and after a crash, at the next start). Needs root."""

    enabled: bool = False
    persistence_mode: bool = True  # on while the broker runs (keeps the driver loaded)
    # Power limit while local services own the GPUs, and while the pool sits idle; unset
    # leaves the card's limit alone. Clamped to each card's range. Listed or rented, a card
    # always runs at its default limit: a renter gets the card as sold.
    local_watts: float | None = Field(default=None, gt=0)
    idle_watts: float | None = Field(default=None, gt=0)


class EcoSection(_Model):
    idle_target_watts: float = Field(default=15.0, gt=0)
    profile: EcoProfile = Field(default_factory=EcoProfile)


NotifyEvent = Literal["listed", "rented", "reclaim", "back", "refused", "degraded", "earnings"]
NOTIFY_EVENTS: tuple[NotifyEvent, ...] = (
    "listed", "rented", "reclaim", "back", "refused", "degraded", "earnings",
)  # fmt: skip


class NotifySection(SecretRef):
    """One `[[notify]]` channel: an apprise URL (ntfy://, tgram://, discord://, mailto://,
    json://, ...), given as is (`url`) or, when it holds a token, from the environment
    (`url_env`) or a file (`url_file`)."""

    url: str | None = None
    url_env: str | None = None
    url_file: Path | None = None
    events: list[NotifyEvent] = Field(default_factory=lambda: list(NOTIFY_EVENTS))
    # At most one message per this; what happens meanwhile is sent together after it.
    min_interval: Duration = timedelta(minutes=1)
    daily_at: str = "09:00"  # local time of the daily earnings line (event "earnings")

    @field_validator("url")
    @classmethod
    def _apprise_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*://\S+", value):
            raise ValueError(f'expected an apprise URL like "ntfy://topic", got "{value}"')
        return value

    @field_validator("daily_at")
    @classmethod
    def _clock_time(cls, value: str) -> str:
        match = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", value)
        if not match:
            raise ValueError(f'expected a time of day like "09:00", got "{value}"')
        return value

    @model_validator(mode="after")
    def _one_source(self) -> NotifySection:
        given = [k for k in ("url", "url_env", "url_file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of url, url_env and url_file")
        return self

    def resolved_url(self) -> str:
        """The URL; `SecretError` naming the key when its variable or file is missing."""
        if self.url is not None:
            return self.url
        value = self._read_secret("notify.url", self.url_env, self.url_file)
        assert value is not None  # _one_source: one of them is set
        return value


# One of the registered marketplaces' sections, chosen by `kind` (statically: their base).
if TYPE_CHECKING:
    ProviderSection = PolledProvider
else:
    ProviderSection = registry.section_union()


class Config(_Model):
    broker: BrokerSection = Field(default_factory=BrokerSection)
    gpus: GpusSection = Field(default_factory=GpusSection)
    services: list[ServiceSection] = Field(default_factory=list)
    policy: PolicySection = Field(default_factory=PolicySection)
    windows: list[WindowSection] = Field(default_factory=list)
    energy: EnergySection = Field(default_factory=EnergySection)
    eco: EcoSection = Field(default_factory=EcoSection)
    provider: ProviderSection = Field(default_factory=lambda: PaperProvider(kind="paper"))
    notify: list[NotifySection] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        problems: list[str] = []
        names = [s.name for s in self.services]
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"services: the name {name!r} is used twice")
        listens: dict[tuple[str, int], str] = {
            parse_hostport(self.broker.api_listen): "broker.api_listen"
        }
        for i, service in enumerate(self.services):
            if service.gate_listen is None:
                continue
            addr = parse_hostport(service.gate_listen)
            if addr in listens:
                problems.append(
                    f"services[{i}].gate_listen: {service.gate_listen} is already used by "
                    f"{listens[addr]}"
                )
            listens[addr] = f"services[{i}].gate_listen"
            up = service.upstream.split("://", 1)[1].split("/", 1)[0]
            if ":" in up and parse_hostport(up) == addr:
                problems.append(
                    f"services[{i}].gate_listen: the gate cannot listen on its own upstream "
                    f"({service.upstream}); move the service (e.g. OLLAMA_HOST) to another port"
                )
        if self.gpus.backend == "fake":
            count = len(self.gpus.fake)
            for i, service in enumerate(self.services):
                for gpu in service.gpus:
                    if gpu >= count:
                        problems.append(
                            f"services[{i}].gpus: GPU {gpu} does not exist "
                            f"(gpus.fake has {count})"
                        )
        if problems:
            # Raised as ValueError so pydantic reports them with the other problems.
            raise ValueError("\n".join(problems))
        return self

    def resolve_paths(self, base: Path) -> Config:
        """Expand `~` and make relative paths relative to the config file's folder."""

        def fix(path: Path) -> Path:
            path = path.expanduser()
            return path if path.is_absolute() else (base / path)

        broker = self.broker.model_copy(update={"state_dir": fix(self.broker.state_dir)})
        return self.model_copy(update={"broker": broker})


# ---------------------------------------------------------------------------------------
# Loading and error reporting


def find_config(explicit: str | os.PathLike[str] | None) -> Path:
    """`-c FILE`, else `$GPU_BROKER_CONFIG`, else ./config.toml, else /etc/gpu-broker/."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env)
    for candidate in DEFAULT_CONFIG_PATHS:
        if candidate.exists():
            return candidate
    tried = ", ".join(str(p) for p in DEFAULT_CONFIG_PATHS)
    raise ConfigError(
        [f"no configuration file: pass -c FILE, set ${CONFIG_ENV}, or create one of {tried}"]
    )


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate one file. Raises `ConfigError` with every problem found."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError([f"cannot read the file: {err.strerror}"], source=str(path)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(["the file is not UTF-8 text"], source=str(path)) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"invalid TOML: {err}"], source=str(path)) from None
    return parse_config(data, source=str(path)).resolve_paths(path.resolve().parent)


def parse_config(data: Mapping[str, Any], source: str | None = None) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err.errors(), data), source=source) from None


def describe_problems(errors: Iterable[ErrorDetails], data: Mapping[str, Any]) -> list[str]:
    """Pydantic errors as "key.path: expected ..." lines (also for `simulate --policy`)."""
    return _describe(errors, data)


def _describe(errors: Iterable[ErrorDetails], data: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    for error in errors:
        path = _key_path(error["loc"], data)
        # A whole-file cross-check (empty path) names its own key paths, one per line.
        for line in _message(error, data).splitlines():
            problems.append(f"{path}: {line}" if path else line)
    return list(dict.fromkeys(problems))


def _key_path(loc: tuple[int | str, ...], data: Mapping[str, Any]) -> str:
    out = ""
    node: Any = data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        # A discriminated union adds the tag ("vast") to the location; it is not a key.
        if isinstance(node, Mapping) and part not in node and node.get("kind") == part:
            continue
        out += f".{part}" if out else part
        node = node.get(part) if isinstance(node, Mapping) else None
    return out


def _message(error: ErrorDetails, data: Mapping[str, Any]) -> str:
    kind = error["type"]
    given = error.get("input")
    if kind == "extra_forbidden":
        key = str(error["loc"][-1])
        parent = _known_keys(error["loc"][:-1], data)
        if key in _INLINE_SECRET_KEYS or key.endswith(("_key", "_token", "_password")):
            if f"{key}_env" in parent:
                return (
                    f"secrets are not accepted inline; use {key}_env (an environment variable) "
                    f"or {key}_file (a file only the broker can read)"
                )
            return "secrets are not accepted inline, and this section takes none"
        close = difflib.get_close_matches(key, parent, n=1)
        return "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
    if kind == "missing":
        return "required key is missing"
    if kind in ("value_error", "assertion_error"):
        return str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "union_tag_invalid":
        expected = error.get("ctx", {}).get("expected_tags", "")
        return f"expected kind to be one of {expected}, got {given!r}"
    if kind == "union_tag_not_found":
        return "required key 'kind' is missing"
    message = str(error["msg"])
    message = message[0].lower() + message[1:]
    if isinstance(given, Mapping | list):
        return message
    return f"{message}, got {given!r}"


def _known_keys(loc: tuple[int | str, ...], data: Mapping[str, Any]) -> list[str]:
    model: Any = Config
    node: Any = data
    for part in loc:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        if isinstance(node, Mapping) and part not in node and node.get("kind") == part:
            model = registry.section_for(part)
            continue
        is_model = isinstance(model, type) and issubclass(model, BaseModel)
        field = model.model_fields.get(part) if is_model else None
        if field is None:
            return []
        model = _model_of(field.annotation)
        node = node.get(part) if isinstance(node, Mapping) else None
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _model_of(annotation: Any) -> Any:
    """The model class inside `list[Model]`, `Model | None` or a plain `Model`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
