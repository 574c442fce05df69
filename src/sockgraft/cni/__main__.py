from sockgraft.cni.plugin import main

main()
