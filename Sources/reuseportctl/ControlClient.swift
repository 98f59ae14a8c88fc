import ReuseportControl
import ReuseportKit

extension ControlClient {
    /// Sends `request` and returns the response, or throws the daemon's refusal.
    func perform(_ request: ControlRequest) throws -> ControlResponse {
        let response = try send(request)
        guard response.ok else { throw CtlError.daemonRefused(response.error ?? "no reason given") }
        return response
    }
}
