"""mailgate: an inbound SMTP content-filtering gateway."""

__version__ = "0.1.0"
