"""The daemon: the reconcile pass, host health, inventory, the store, triggers and the service around them."""
