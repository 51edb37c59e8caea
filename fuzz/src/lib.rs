//! Fuzz targets live in tests/targets.rs; see README.md.
