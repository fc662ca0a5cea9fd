"""Client routing: the Router, HAProxy (config generator, runtime API, typed stats), the front door, admission."""
