//! (being written) counter-based random numbers.
