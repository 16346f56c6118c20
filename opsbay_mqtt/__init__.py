"""opsbay-mqtt: an MQTT job bus for operations teams."""

__version__ = "0.1.0"
