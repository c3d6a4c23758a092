//! pai-adapters end to end, on real directories: the registry's life cycle and its refusals.

mod registry;
