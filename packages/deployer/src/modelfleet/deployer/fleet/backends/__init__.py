"""Fleet backends: how the rollout engine reaches devices (MQTT now, IoT Hub later)."""
