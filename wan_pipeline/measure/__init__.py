"""Measuring a clip: temporal-consistency metrics, GPU and environment telemetry, image and video IO. No torch."""
