"""Training: the loop (:mod:`.trainer`), its loss (:mod:`.losses`), lr (:mod:`.lr`) and progress
(:mod:`.progress`)."""
