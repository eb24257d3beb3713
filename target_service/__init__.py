"""The MLaaS target: hosted classifiers behind API keys, budgets and label-only answers."""
