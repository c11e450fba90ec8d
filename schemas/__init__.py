"""Bus contracts (events) and definition models, with their generated JSON Schema and AsyncAPI files."""
