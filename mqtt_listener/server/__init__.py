"""Server glue: where the runner lives inside an Odoo server (filled in by the runtime work)."""


def install_server_integration():
    """Hook the runner into Odoo's server; called once from the post_load hook."""
