"""The policy server without Ray: its configuration, the batched model runtime, the direct socket route.

config.py   ServeConfig: every key the Serve deployments take, validated (no torch)
runtime.py  PolicyRuntime: one replica's model: validated batched inference, atomic head swaps (torch)
direct.py   DirectServer / DirectConnection: a replica's TCP socket and a robot's connection (msgpack frames)
"""
