"""Api mode: programs written for grafting. The fd service (server side), its client, the Python
graft API (`graftsocket`) and the attach step."""
