"""Time-based decisions: availability windows and tariff periods."""
