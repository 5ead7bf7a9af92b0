"""What the API tier and the workers share: settings, keys, events, cursor, pacing, store."""
