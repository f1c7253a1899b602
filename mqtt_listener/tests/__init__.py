from . import test_access, test_models, test_schema_contract
