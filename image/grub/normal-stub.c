/* Stands in for GRUB's normal.mod (115 KB) in the floppy's boot loader:
   linux.mod needs only this one symbol from it (the pause after an
   error message). */
void grub_wait_after_message (void);
void grub_wait_after_message (void) { }
