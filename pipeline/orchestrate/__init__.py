"""How stages are declared, keyed, stored and launched: the one pipeline behind the CLI, DVC and Prefect."""
