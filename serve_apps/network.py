"""Where Serve replicas listen. Serve 2.60 binds each replica's inter-deployment gRPC server to
every interface (`[::]:0`, hard-coded in `ray.serve._private.replica`), so any host that reaches
the machine could call replicas directly, past the HTTP edge and its policies.
`bind_to_node_ip` binds that server to the node's own address instead: loopback on the local
head (which runs with `--node-ip-address=127.0.0.1`), the node's private address on a cluster,
where Serve's handles reach it all the same. It runs when a replica imports the platform's code,
before the replica starts that server (`serve_apps/http.py`, imported by every deployment).
"""

from __future__ import annotations

import functools


@functools.cache
def bind_to_node_ip() -> None:
    """Patch, once per process, where Serve replicas bind their inter-deployment server."""
    import ray

    if not ray.is_initialized():  # not a Ray worker (the CLI before it connects)
        return
    from ray.serve._private import replica

    host = ray.util.get_node_ip_address()
    host = f"[{host}]" if ":" in host else host
    original = replica.add_port_to_grpc_server

    def add_port(server, address: str):
        if address.startswith("[::]:"):
            address = f"{host}:{address.removeprefix('[::]:')}"
        return original(server, address)

    replica.add_port_to_grpc_server = add_port
