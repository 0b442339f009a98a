//! mergekit YAML recipes: translated into `.merge` scripts, then compiled like any script.
