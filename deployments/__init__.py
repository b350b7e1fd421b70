"""Ray Serve deployments: the batched policy server and the HTTP ingress."""
