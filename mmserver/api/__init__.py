"""HTTP API: the V2 routes and the application factory."""
