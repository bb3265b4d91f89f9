"""Run the fedpeft apps on Flower's deployment runtime (SuperLink + SuperNodes).

The same ClientApp/ServerApp the simulator uses run across real machines. This package
holds what that needs around the apps: TLS material (:mod:`.certs`), SuperNode
authentication keys (:mod:`.keys`), the Flower App directory that ``flwr run`` ships
(:mod:`.app`) and a process launcher for a local federation (:mod:`.launcher`).
See ``docs/deployment.md`` for the commands.
"""
