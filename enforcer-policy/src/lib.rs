//! The Policy Decision Point. (Being written.)
