"""The stateless SSE tier."""
