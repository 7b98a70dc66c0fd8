"""arjax.decode: prefill, the jitted while_loop decoder, and samplers."""
