//! The server's resident memory after logins.
//!
//! Each login verifies an argon2id hash with 19 MiB of working memory. glibc serves a block
//! that large with mmap, and on freeing it raises its mmap threshold to that size (the
//! "dynamic threshold"), so every later 19 MiB block comes from the heap arenas and stays
//! resident after it is freed: four logins took a server from 19 MiB to 96 MiB. Fixing the
//! threshold at glibc's default turns that behaviour off: large blocks stay mmapped and go back
//! to the kernel when freed (four logins: 19 MiB to 20 MiB).

/// glibc's default mmap threshold, fixed (setting it disables the dynamic adjustment).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

/// Fixes glibc's mmap threshold for the life of the process (see the module docs). Called once
/// when the server's state is made; other allocators need nothing.
pub(crate) fn return_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets a parameter of glibc's allocator, which is thread-safe; it
    // takes no pointers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}
