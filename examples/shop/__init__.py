"""A small shop: orders paid over HTTP, confirmed by e-mail, shipped by a child task."""
