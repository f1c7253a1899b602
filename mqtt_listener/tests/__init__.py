from . import test_access, test_end_to_end, test_models, test_schema_contract, test_server_glue
