"""U-Flow edge inspection agent: camera -> engine -> scoring -> NFA -> MQTT. Never imports torch."""

__version__ = "0.1.0"
