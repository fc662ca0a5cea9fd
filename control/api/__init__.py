"""The control API: the gRPC server, its guard and audit, TLS, and recctl (the operator's command line)."""
