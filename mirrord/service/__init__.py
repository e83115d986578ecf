"""Running as a service: the daemon's event loop, its control socket, the
service manager's notifications and where the log goes."""
