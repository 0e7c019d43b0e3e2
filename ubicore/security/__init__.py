"""Sans-IO security: the AMP key exchange, session crypto, the session guard, the policy."""
