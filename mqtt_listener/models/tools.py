"""Small helpers the models share, written once so they read the same on Odoo 17, 18 and 19."""


def check_operation(records, operation):
    """Raise AccessError unless the current user may ``operation`` on ``records``.

    ``check_access`` exists from Odoo 18 on (``check_access_rights`` warns there and is gone in
    19); Odoo 17 only has the pair of older methods.
    """
    if hasattr(records, "check_access"):
        records.check_access(operation)
    else:  # Odoo 17
        records.check_access_rights(operation)
        records.check_access_rule(operation)
