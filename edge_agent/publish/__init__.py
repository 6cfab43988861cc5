"""What leaves the agent, in the order it leaves (the payloads are ``edge_agent.messages``, the contract
floor): ``outbox`` and
``spool`` (nothing is lost while the broker is down), ``client`` (the one MQTT client factory) and
``mqtt`` (the publisher thread); ``commands`` answers the ``cmd/*`` topics.
"""
