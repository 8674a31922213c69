"""The gateway (data plane): following the route table and proxying inference requests to ready replicas.

Modules, from the process down to the socket:

- ``server``: process startup (settings, listening socket), ``run_gateway``, ``GatewayError``;
- ``frontend``: the HTTP/1.1 server of the data-plane port (an asyncio protocol, httptools), which
  hands each request to the app as ASGI;
- ``app``: the ASGI app: lifecycle, which path goes where, the bearer token;
- ``proxy``: one request forwarded to a backend and its response streamed back, retried once on a
  connection failure (blue-green switches);
- ``activator``: requests for a serverless deployment held while it has no ready replica;
- ``balancer``: which backend (least outstanding requests, ties round-robin);
- ``load``, ``demand_client``: the load of serverless deployments, reported to the daemon;
- ``follower``: following ``routes.db``, keeping the last table read;
- ``routes``: the route table contract shared with the daemon;
- ``pool``, ``connections``, ``codecs``: the upstream HTTP/1.1 client (kept-alive connections,
  one connection's protocol, request writing and response parsing);
- ``responses``, ``metrics``: the gateway's own JSON responses and its Prometheus metrics.
"""
