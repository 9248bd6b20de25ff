"""ASTM E1394 / CLSI LIS2-A2: record codec, capture-file reader and the generic driver."""
