"""Keeps a Serve replica's inter-deployment gRPC server off the other network interfaces.

Every Serve replica starts a gRPC server for calls from deployment handles, and Ray Serve binds it to
``[::]:0``, every interface of the machine, with no option or environment variable to change that
(``ray.serve._private.replica.ReplicaBase._on_initialized``). Handles reach a replica at
``<node IP>:<port>`` (``ray.serve._private.request_router.replica_wrapper``), so binding to the node's
IP serves every caller: on a local Ray (node IP 127.0.0.1) the server stays on loopback, like the HTTP
proxy and Ray's own servers; on a cluster it binds the address Ray uses for that node.

Serve starts that server after the deployment's constructor has run, in the same process, so the
constructor can wrap the module's bind helper first. If a Ray version moves the helper, nothing is
wrapped and the replica binds as Serve does; the bind test then names the listener that escaped.

What stays Ray's to decide: on a local Ray (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which gard sets)
all of Ray's servers bind 127.0.0.1. When Ray runs as a cluster its own servers (GCS, raylet, worker
and agent servers) bind the node IP or every interface by Ray's rules, guarded by Ray's token
authentication; gard cannot change that. Serve's gRPC ingress proxy and per-replica direct ingress would
also bind every interface, but gard never starts them (no ``grpc_servicer_functions``; direct ingress
is off unless ``RAY_SERVE_ENABLE_DIRECT_INGRESS`` is set).
"""

from __future__ import annotations

_WILDCARD = "[::]:"


def bind_replica_grpc_to_node_ip() -> str | None:
    """Makes this process's Serve replica bind its gRPC server to the node's IP; returns that IP, or
    None when Serve's bind helper was not found (then the replica binds all interfaces)."""
    import ray

    try:
        from ray.serve._private import replica as replica_module
    except ImportError:
        return None
    bind = getattr(replica_module, "add_port_to_grpc_server", None)
    if bind is None:
        return None
    host = ray.util.get_node_ip_address()
    if getattr(bind, "bound_host", None) is not None:  # a second replica object in this process
        return bind.bound_host
    host_part = f"[{host}]" if ":" in host else host

    def bind_to_node_ip(server, address: str):
        if address.startswith(_WILDCARD):
            address = f"{host_part}:{address[len(_WILDCARD):]}"
        return bind(server, address)

    bind_to_node_ip.bound_host = host
    replica_module.add_port_to_grpc_server = bind_to_node_ip
    return host
