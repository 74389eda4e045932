"""OpenAI-compatible serving: api_server, api_client and the web UI."""
