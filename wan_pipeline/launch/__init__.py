"""Launching on several processes: process groups, torchrun, the rank entry point. torch only inside functions."""
