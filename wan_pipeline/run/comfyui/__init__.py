"""A running ComfyUI server as a benchmark backend: `client` (HTTP and websocket, event timing) and `case` (rounds,
stages, the record). Neither imports torch: the server does the work."""
