"""`smoe export`: a trained model as a Hugging Face directory that runs without smoe or DeepSpeed."""
