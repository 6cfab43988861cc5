"""A line's controller (PLC) talks to the agent natively (docs/plc.md).

- the ``[plc]`` keys: edge_agent/config_plc.py (on the config's floor);
- ``handshake.py``: the smart-camera handshake, protocol-free: trigger/busy/ready, results with
  ResultsValid/ResultsAck and a bounded queue, counters;
- ``opcua.py``: the OPC UA server (asyncua) over the handshake; ``security.py``: its certificate, users
  and sessions;
- ``modbus.py``: the Modbus TCP server (pymodbus) over the same handshake;
- ``bridge.py``: what the agent calls: builds the handshake and servers, feeds them triggers' fates and
  decided parts.

asyncua and pymodbus are the optional ``plc`` extra; nothing here is imported unless a server is enabled.
"""
