"""The milter front end: a sans-IO protocol codec and state machine
(codec.py, protocol.py), message assembly under the shared memory budget
(message.py) and the asyncio listener that only moves bytes (listener.py)."""
