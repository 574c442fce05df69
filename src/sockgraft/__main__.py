from sockgraft.cmd.graft import main

main()
