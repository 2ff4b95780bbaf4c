"""Built-in mailgate filters, one module per filter, each following gateway.filterapi."""
