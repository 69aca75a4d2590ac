"""Fleet backends the agent talks through (MQTT now, Azure IoT Hub later); see `base.py`."""
