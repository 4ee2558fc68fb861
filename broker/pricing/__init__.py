"""Pricing like the market (`price_gpu = "market"`): the `[provider.pricing]` settings
(`settings.py`), the pure ask (`ask.py`), the market read (`market.py`) and its watcher
(`watch.py`)."""
