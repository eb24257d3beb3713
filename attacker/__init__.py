"""The attacker: oracle clients, query selection, extraction, transfer attacks and reports."""
