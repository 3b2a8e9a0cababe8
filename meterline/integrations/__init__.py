"""Drop-in integrations of meterline into gateways (LiteLLM)."""
